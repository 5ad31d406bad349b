"""Tests of how the engine fails on damaged or hostile model folders."""
