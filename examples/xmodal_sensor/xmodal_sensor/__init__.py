"""xmodal-sensor: a 1-D sensor-series modality for xmodal, as an installable plug-in.

- ``sensor`` modality (xmodal_sensor/modality.py): ``key.npy`` members, float ``[C, L]``, loaded
  with ``allow_pickle=False`` (a shard can never run code);
- ``SeriesEncoder`` (xmodal_sensor/nets.py) for the captioner's ``model.encoder`` slot;
- ``experiment=sensor_caption`` (xmodal_sensor/conf/), found through the Hydra search-path plug-in
  in hydra_plugins/xmodal_sensor_searchpath/;
- ``xmodal-sensor-synth`` (xmodal_sensor/synth.py) writes a small captioned dataset to try it on.
"""

from __future__ import annotations


def register() -> None:
    """Entry point of the ``xmodal.plugins`` group."""
    from xmodal.registry import MODALITIES

    MODALITIES.register("sensor", "xmodal_sensor.modality:SensorModality")
