"""CEMA as a distributed system on Ray: device-host actors (many simulated devices each) and one
cloud adapter actor, connected by uploads and registry-published parameter versions."""
from .adapter import CloudAdapterActor
from .upload_log import read_uploads
from .config import FLEET_PRESETS, FleetConfig
from .host import DeviceHost
from .run import run_fleet

__all__ = ["CloudAdapterActor", "read_uploads", "FLEET_PRESETS", "FleetConfig", "DeviceHost", "run_fleet"]
