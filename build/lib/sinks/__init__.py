"""Destinations. One module per sink type; `registry` ties their configs into one union."""
