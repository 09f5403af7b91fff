"""Stage 7, report: report.json, report.md with its figures, and what train() returns."""
