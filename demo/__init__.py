"""The demo page (index.html, demo.js, preview.js, demo.css) and its local server: `python -m demo`."""
