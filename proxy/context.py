"""What every handler needs: the settings and the archives, and which archives to ask for a study."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Settings
from .upstream import Archive


@dataclass
class Context:
    """Per-process state shared by all requests."""

    settings: Settings
    archives: list[Archive] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> Context:
        """Build archives in priority order (highest first, then configuration order)."""
        ordered = sorted(settings.archives, key=lambda a: -a.priority)
        return cls(settings, [Archive(a) for a in ordered])

    def archive(self, name: str) -> Archive | None:
        """The archive with this configured name."""
        return next((a for a in self.archives if a.name == name), None)

    def archives_for(self, study_uid: str) -> list[Archive]:
        """Archives to try, in order, for a retrieve within `study_uid`."""
        return list(self.archives)

    def store_target(self) -> Archive | None:
        """The archive that takes stores."""
        return next((a for a in self.archives if a.config.stores), None)

    async def close(self) -> None:
        """Release every archive's connections."""
        for a in self.archives:
            await a.close()
