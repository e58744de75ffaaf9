"""iptables/ip6tables rulesets: the rule model, canonical form, lockout check."""
