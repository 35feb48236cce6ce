"""The lab's widgets: each owns one pane and is fed by the app (attributes down, messages up)."""
