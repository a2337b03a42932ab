"""The parts recipes are built from, each small and testable on its own: UDA's (EMA teacher,
ClassMix, MIC masks, pseudo-labels, strong augmentation, feature distance), SPN's (the
domain-generalisation photometric augmentation), PIG's and EGLP's (NFNet's dark mix, fusion,
image similarity, DNIS, RCM) and the pseudo-label diagnostic. A recipe (``methods/*.py``)
composes them into phases; a part never imports a recipe."""
