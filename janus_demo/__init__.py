"""The embedded demo: a generated multimodal world (``world``) written as WebDataset shards
(``synth``), a tiny VQ fitted on it (``vq``), a scene recogniser for decoded images
(``recognize``), the demo's evaluation metrics built on it (``metrics``), and the report that
shows the tiny model learned (``report``)."""
