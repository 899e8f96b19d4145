"""The compression report: records filled during a fit, the summary computed from them, its renderings
(console, Markdown, JSON, PNG) and its publication at the end of a fit."""
