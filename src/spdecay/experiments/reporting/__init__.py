"""Reporting: report.md, the plots, paired statistics and the results files."""
