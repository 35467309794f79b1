"""Using a trained model: predict on new videos, export to one file, timelines of long videos."""
