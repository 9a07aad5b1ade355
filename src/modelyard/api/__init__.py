"""HTTP front-ends over the model manager."""
