"""Hydra finds this package's configs (``experiment=sensor_caption``) once it is installed."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class XmodalSensorSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="xmodal-sensor", path="pkg://xmodal_sensor.conf")
