"""refformer.refimpl.convert: models to and from other formats — torch modules and state_dicts in (torch), golden
reference outputs and gradients out (golden); see docs/DESIGN.md ("Layout")."""
