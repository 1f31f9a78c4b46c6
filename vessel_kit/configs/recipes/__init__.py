"""The training recipes: one YAML file per recipe, named after it (see ``vessel_kit.recipes``)."""
