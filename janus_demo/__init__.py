"""The embedded demo: a generated multimodal world (``world``, ``synth``), a tiny VQ fitted on it
(``vq``), and the report that shows the tiny model learned (``report``)."""
