"""Volumes: configuration and (later) the catalogue of volumes a server exports."""
