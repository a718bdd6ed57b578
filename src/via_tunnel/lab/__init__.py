"""The namespace lab of the demo, the tests and the benchmarks: beside the layers, it may
import only ``core`` and ``kernel`` (tests/test_layers.py).

This package re-exports the lab's public API, and only that: :class:`Lab`,
:class:`Capture`, :class:`LabError`, :func:`cgroup2_mount`, :func:`remove_footprint`,
:func:`netns_names` and :func:`remove`. Everything else is imported from its module.
"""

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.footprint import cgroup2_mount, remove_footprint
from via_tunnel.lab.namespaces import netns_names, remove
from via_tunnel.lab.netlab import Lab
from via_tunnel.lab.procs import LabError

__all__ = ["Capture", "Lab", "LabError", "cgroup2_mount", "netns_names", "remove",
           "remove_footprint"]
