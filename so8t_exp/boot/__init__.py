"""Boot-time resume: the OS task that runs ``python -m so8t_exp.resume`` at logon or boot
(``python -m so8t_exp.boot install | status | remove | print``)."""
