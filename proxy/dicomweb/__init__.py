"""The DICOMweb services: routes and the search, retrieve, metadata, frames, objects and store handlers."""
