"""The Streamlit dashboard over run directories (`tune dashboard`); app.py is the Streamlit script."""
