"""nnU-Net experiment planners that force a fixed spacing and patch (see :mod:`planners.fixed_geometry`)."""
from planners.fixed_geometry import PLANNERS, FixedGeometry, nnPrePlanner, nnPreResEncLPlanner

__all__ = ["PLANNERS", "FixedGeometry", "nnPrePlanner", "nnPreResEncLPlanner"]
