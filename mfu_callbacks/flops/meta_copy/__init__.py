"""The model side of the engine: a meta-device replica of the model, run on probe batches while every
matmul and what its backward needs are recorded (checkpoint recompute, flex_attention and analytic
substitutes included)."""
