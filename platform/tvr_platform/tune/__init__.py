"""Ray Tune campaigns over job specs."""
