"""EGLP's parts (RCM, DNIS, FIS/DMS, prompts), each small and testable on its own."""
