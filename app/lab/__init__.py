"""The training lab (pages/training.py): knobs, the one-run-per-server manager, per-session callbacks, views, the
worker process that trains, and the lab's record tables and charts. Import the submodules (this package imports
nothing, so the worker process stays free of Streamlit)."""
