"""/etc history, drift classification and mail, AppArmor denials."""
