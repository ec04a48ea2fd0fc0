"""Everything that touches rclpy: message conversions, the synchroniser, the node."""
