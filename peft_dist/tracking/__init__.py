from peft_dist.tracking.mlflow_logger import NullTracker, Tracker, default_tracking_uri, make_tracker

__all__ = ["Tracker", "NullTracker", "make_tracker", "default_tracking_uri"]
