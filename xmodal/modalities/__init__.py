"""Modalities (image, audio, video, text, label; plug-ins add more), registered by name.

Each module owns one modality: the shard members it reads, decode (bytes → tensors, with its
checks), collate, conversion to model units after the device transfer, display, and reading
``xmodal-generate`` inputs. The data pipeline and the tasks reach them through
``xmodal.registry.MODALITIES`` and the roles of xmodal/modalities/roles.py.
"""

from xmodal.registry import MODALITIES

# Hints: what xmodal-generate's flags need, known without importing the modules (and torch);
# tests/test_user_sees.py checks that they equal the classes' own attributes.
for _name, _path, _hints in (
    ("image", "xmodal.modalities.image:ImageModality", {"input_flag": None, "input_files": True}),
    ("audio", "xmodal.modalities.audio:AudioModality", {"input_flag": None, "input_files": True}),
    ("video", "xmodal.modalities.video:VideoModality", {"input_flag": None, "input_files": True}),
    ("text", "xmodal.modalities.text:TextModality", {"input_flag": "caption", "input_files": False}),
    ("label", "xmodal.modalities.label:LabelModality", {"input_flag": "label", "input_files": False}),
):
    MODALITIES.register(_name, _path, **_hints)
