"""What a build says: report.json, report.md and report.html, the manifest, the terminal table,
and the words they share."""
