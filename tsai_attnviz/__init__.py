"""See what the self-attention of tsai's ConvTranPlus looks at: weight-exposing layers, a fastai recorder and plots

Modules:

- `tsai_attnviz.recorder`: `AttnRecorder`, a fastai callback that copies selected attention maps while a Learner validates or predicts, and `AttnRecording`, the container it fills."""

__version__ = "0.1.0"
