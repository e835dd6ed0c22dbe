"""Modalities (image, audio, text, label; plug-ins add more), registered by name.

Each module owns one modality: the shard members it reads, decode (bytes → tensors, with its
checks), collate, conversion to model units after the device transfer, display, and reading
``xmodal-generate`` inputs. The data pipeline and the tasks reach them through
``xmodal.registry.MODALITIES`` and the roles of xmodal/modalities/roles.py.
"""

from xmodal.registry import MODALITIES

for _name, _path in (
    ("image", "xmodal.modalities.image:ImageModality"),
    ("audio", "xmodal.modalities.audio:AudioModality"),
    ("text", "xmodal.modalities.text:TextModality"),
    ("label", "xmodal.modalities.label:LabelModality"),
):
    MODALITIES.register(_name, _path)
