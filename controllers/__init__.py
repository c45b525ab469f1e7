"""Rule-based controllers, the safety shield and the live control loop."""
