"""The Ray layer: expert worker actors, the controller, the Serve gateway and the app builder.
The only package that imports `ray`."""
