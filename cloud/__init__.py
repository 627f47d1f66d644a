"""Cloud: Ray Serve application turning fleet code streams into sound events."""
