"""armorstream command line and process supervision (the outermost layer)."""

__all__: list[str] = []
