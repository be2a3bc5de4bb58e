"""Loss functions shared by the methods."""
