"""Config files shipped with the package (data, not code): ``recipes/`` holds the training recipes
that ``vessel_kit.recipes`` lists and loads, ``infer/`` the inference presets of
``InferConfig.load``."""
