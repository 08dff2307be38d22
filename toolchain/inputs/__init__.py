"""What a build starts from: the model file loaded, its non-tensor arguments fixed, the calibration
and validation data read and checked against the model's inputs."""
