"""What a run shows and leaves: console, logs, report, pictures, exports, energy."""
