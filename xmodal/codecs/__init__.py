"""Codecs: bytes → arrays for the formats modalities read (images via libspng/libjpeg-turbo/PIL,
audio via WAV/FLAC readers and a log-mel front end). Pure functions; they import nothing of xmodal."""
