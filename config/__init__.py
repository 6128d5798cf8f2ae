"""EZTinker configuration: one typed settings object read from the environment."""

from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]
