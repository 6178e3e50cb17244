"""What operators see and run: alerts, metrics, systemd notification, drills, the scorecard."""
