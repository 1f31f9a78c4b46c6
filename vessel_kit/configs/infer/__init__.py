"""The inference presets: one YAML file of ``InferConfig`` options per preset (see ``vessel_kit.infer_config``)."""
