"""Figures and pages from plain data (no run directories, no models): the one home of plotting.

:mod:`vitkit.report.html` renders the HTML report page; the stage that reads run directories for it
is :mod:`vitkit.stages.report`.
"""
