"""Dataset readers and video decoding in plain Python / numpy / PyAV (no Ray, no boto3).

- ``synthetic``   generated MP4 clips of moving shapes + MSR-VTT-format annotation files
- ``annotations`` readers of the published annotation formats -> :class:`Manifest`
- ``frames``      PyAV decoding with keyframe-aware sampling of T frames, resize, normalise
"""
