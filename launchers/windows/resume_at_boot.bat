@echo off
rem Resume the newest unfinished so8t_exp run. The boot task (python -m so8t_exp.boot install,
rem or register_boot_task.bat) starts this at logon through run_hidden.vbs: no console window.
rem Output is appended to <project>\logs\resume_at_boot.log (SO8T_LOG_DIR to move it); the
rem launcher timestamps every line itself, the same format as on Linux. Extra arguments are
rem passed on, e.g. resume.dry_run=true. Exit code: the launcher's (0 done or nothing to do,
rem 2 bad config, 4 not resumable, 6 store unreachable, else the trainer's); 8 it succeeded
rem but the log could not be written; 9009 no Python found (the log and console say so).
rem No blocks ( ... ) around lines that expand paths: a ")" in a folder name would end them.
setlocal EnableExtensions DisableDelayedExpansion

rem The console's code page, restored on the way out ("Active code page: 850." and the like).
set "OLDCP="
for /f "tokens=2 delims=:" %%C in ('chcp') do set "OLDCP=%%C"
if defined OLDCP set "OLDCP=%OLDCP: =%"
if defined OLDCP set "OLDCP=%OLDCP:.=%"
chcp 65001 >nul
set "PYTHONUTF8=1"
set "PYTHONIOENCODING=utf-8"
set "PYTHONUNBUFFERED=1"
set "SO8T_STAMP_LINES=1"

rem The project root from this file's own location, never the current directory.
for %%I in ("%~dp0..\..") do set "ROOT=%%~fI"
set "LOGDIR=%ROOT%\logs"
if defined SO8T_LOG_DIR set "LOGDIR=%SO8T_LOG_DIR:"=%"
set "LOG=%LOGDIR%\resume_at_boot.log"
if not exist "%LOGDIR%\" mkdir "%LOGDIR%" >nul 2>&1
rem A command with a redirection that fails does not run: LOGOK stays 0.
set "LOGOK=0"
set "LOGOK=1" >> "%LOG%" 2>nul
if "%LOGOK%"=="0" echo resume_at_boot: cannot write the log "%LOG%": output goes to this console 1>&2

rem SO8T_PYTHON if set (quotes around it dropped: set VAR="..." is common), else the
rem project's virtual environment, else the py launcher.
set "PYARGS="
set "PYEXE="
if defined SO8T_PYTHON set "PYEXE=%SO8T_PYTHON:"=%"
if defined PYEXE goto :run
set "PYEXE=%ROOT%\.venv\Scripts\python.exe"
if exist "%PYEXE%" goto :run
set "PYEXE="
for %%P in (py.exe) do set "PYEXE=%%~$PATH:P"
set "PYARGS=-3"
if defined PYEXE goto :run

rem The message goes through a FOR variable: expanded after cmd has parsed & ( ) in the line.
set "MSG=resume_at_boot: error: no Python found: neither %ROOT%\.venv\Scripts\python.exe nor the py launcher (py.exe) on PATH; create the venv (README, Windows) or set SO8T_PYTHON to a python.exe"
for %%M in ("%MSG%") do echo %%~M 1>&2
if "%LOGOK%"=="1" for %%M in ("%MSG%") do >> "%LOG%" echo [%DATE% %TIME%] %%~M
set "CODE=9009"
goto :end

:run
cd /d "%ROOT%"
if "%LOGOK%"=="0" goto :run_to_console
"%PYEXE%" %PYARGS% -m so8t_exp.resume %* >> "%LOG%" 2>&1
set "CODE=%ERRORLEVEL%"
goto :end

:run_to_console
"%PYEXE%" %PYARGS% -m so8t_exp.resume %*
set "CODE=%ERRORLEVEL%"
if "%CODE%"=="0" set "CODE=8"

:end
if defined OLDCP chcp %OLDCP% >nul 2>&1
exit /b %CODE%
