"""Models: the timm factory and offline weight converters."""
