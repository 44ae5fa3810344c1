"""The report: aggregation, figures, Markdown/HTML, what inspect_results prints."""
