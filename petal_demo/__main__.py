from petal_runtime.errors import exit_on_user_error

from .demo import main

exit_on_user_error(main)()
